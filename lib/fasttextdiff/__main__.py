"""`python -m fasttextdiff`: the command line."""

from fasttextdiff.commands.main import main

raise SystemExit(main())
