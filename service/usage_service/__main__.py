"""`python -m usage_service`: the `usage-service` command."""

import sys

from usage_service import cli

sys.exit(cli.main())
