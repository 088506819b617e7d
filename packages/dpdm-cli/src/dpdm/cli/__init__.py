"""The ``dpdm`` command line (Typer + rich). Entry point: ``dpdm.cli.main:main``."""
