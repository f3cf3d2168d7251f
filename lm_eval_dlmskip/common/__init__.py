"""The bottom layer: small helpers every other layer may use (atomic files, norms, family names,
the CLI's help format, the resume command). Nothing here imports the rest of the package."""
