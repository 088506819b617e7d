"""Component registries fed by pluggy hooks: the hook specifications, the registry, and dpdm-core's built-in
plugin (registered through dpdm-core's own ``dpdm`` entry point, like any other plugin)."""
