"""What a person sees and types: the Textual app and the `hearth` command line.

No ML and no protocol logic lives here: screens and commands call services in `training/`,
`mesh/` and `serving/`.
"""

__version__ = "0.1.0"
