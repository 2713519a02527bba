"""`python -m consent_guard ...`: the same as the `consent-guard` command (from any folder
where this package can be imported: the plugin folder, or any folder once it is installed)."""
import sys

from .cli import main

sys.exit(main())
