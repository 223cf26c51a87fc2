"""The ASGI app the server runs: MONAI Label's FastAPI app with FastTextDiff's HTTP layer installed
before uvicorn serves a request.

    monailabel start_server --app monailabel_app --studies studies/demo --uvicorn_app server:app ...

(`make serve` passes this, with monailabel_app/ on PYTHONPATH.) MONAI Label 0.8.5 builds its FastAPI
app (`monailabel.app.app`) at import and hands `--uvicorn_app` to `uvicorn.run`; this module loads the
FastTextDiff app first (MONAI Label's `app_instance()`, which imports main.py and a fresh `lib`), then
lets that instance install the app-level exception handlers, the body guard, the replacement and
additional endpoints and the token check (`FastTextDiffApp.install_http`, lib/routes.py), all on the
same `monailabel.app.app` before the first request. MONAI Label's lifespan then finds the same cached
instance. A process that serves several apps in turn (the tests) calls `build()` again after
`clear_cache()`.
"""

from __future__ import annotations

import monailabel.app
from monailabel.interfaces.utils.app import app_instance


def build():
    """monailabel.app.app, with the current app instance's HTTP layer installed (once per instance)."""
    fastapi_app = monailabel.app.app
    instance = app_instance()
    if getattr(fastapi_app.state, "fasttextdiff_app", None) is not instance:
        instance.install_http(fastapi_app)
        fastapi_app.state.fasttextdiff_app = instance
    return fastapi_app


app = build()
