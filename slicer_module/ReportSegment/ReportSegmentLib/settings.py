"""Keys and defaults for values the module remembers in Slicer's application settings
(``qt.QSettings``); kept here so tests and scripts use the same names."""

SETTINGS_GROUP = "ReportSegment"
SERVER_URL_KEY = SETTINGS_GROUP + "/serverUrl"
SERVER_URL_HISTORY_KEY = SETTINGS_GROUP + "/serverUrlHistory"
TIMEOUT_KEY = SETTINGS_GROUP + "/timeoutSeconds"
MODEL_KEY = SETTINGS_GROUP + "/model"
STRATEGY_KEY = SETTINGS_GROUP + "/strategy"
UNCERTAINTY_OPACITY_KEY = SETTINGS_GROUP + "/uncertaintyOpacity"

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_SECONDS = 300.0
DEFAULT_MODEL = "fasttextdiff"
DEFAULT_STRATEGY = "uncertainty"
DEFAULT_UNCERTAINTY_OPACITY = 0.4
#: How often the widget asks the server for train status (milliseconds).
TRAIN_POLL_INTERVAL_MS = 2000
#: Environment variable read by ReportSegmentTest (inside Slicer) for the server to test against.
TEST_SERVER_URL_ENV = "FASTTEXTDIFF_SERVER_URL"
