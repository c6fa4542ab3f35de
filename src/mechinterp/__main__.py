import sys

from mechinterp.cli import main

sys.exit(main())
