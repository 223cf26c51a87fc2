"""Run the ReportSegment module's tests inside 3D Slicer, headless.

    Slicer --no-splash --no-main-window \\
        --additional-module-paths <repo>/slicer_module/ReportSegment \\
        --python-script <repo>/slicer_module/run_slicer_tests.py [--server http://127.0.0.1:8000]

Without ``--server`` (or the FASTTEXTDIFF_SERVER_URL environment variable) only the scene tests
run; with it, the whole Slicer-side scenario runs against that FastTextDiff server. Slicer exits
with 0 when every test passed, 1 otherwise.
"""

import os
import sys
import unittest

import slicer

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.join(HERE, "ReportSegment")


def main(argv):
    if "--server" in argv:
        index = argv.index("--server")
        if index + 1 >= len(argv):
            print("--server needs a URL, e.g. --server http://127.0.0.1:8000")
            return 2
        os.environ["FASTTEXTDIFF_SERVER_URL"] = argv[index + 1]
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    import ReportSegment

    suite = unittest.TestLoader().loadTestsFromTestCase(ReportSegment.ReportSegmentTest)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
