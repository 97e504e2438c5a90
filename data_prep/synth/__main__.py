"""`python -m data_prep.synth`: the same as `mmrecall generate`."""
import sys

from data_prep.synth.cli import main

sys.exit(main())
