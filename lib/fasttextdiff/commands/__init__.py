"""The `fasttextdiff` command line: every argparse parser and the thin commands over the library."""
