"""The bottom layer: small helpers every other layer may use (atomic files, norms, family names,
the CLI's help format, the resume command, the error of a user setting). Nothing here imports the
rest of the package."""
