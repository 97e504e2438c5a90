"""`python -m mmrecall_cli <command>`: the same as the `mmrecall` command."""
import sys

from mmrecall_cli import main

sys.exit(main())
