"""acme_dpdm: an example third-party plugin for dpdm (see ``acme_dpdm.plugin``)."""

__version__ = "0.1.0"
