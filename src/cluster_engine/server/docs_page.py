"""``/docs``: the API documentation page, rendered by Swagger UI from assets the service serves itself.

The assets come from the swagger-ui-py package (its bundled Swagger UI distribution), so the page works
with no network access; the page itself is a few lines that point Swagger UI at ``openapi.json``. Its
URLs are relative, so that ``/api/docs`` loads everything from under ``/api`` (also behind a proxy that
strips a prefix).
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

ASSETS = "/docs/assets"
RELATIVE_ASSETS = ASSETS[1:]  # resolved against the page: /docs -> /docs/assets, /api/docs -> /api/docs/...

PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>cluster-engine — Images API</title>
  <link rel="stylesheet" href="{RELATIVE_ASSETS}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{RELATIVE_ASSETS}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{RELATIVE_ASSETS}/swagger-ui-bundle.js"></script>
  <script src="{RELATIVE_ASSETS}/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout",
      validatorUrl: null
    }});
  </script>
</body>
</html>
"""


async def docs(_request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


def routes() -> list[Route | Mount]:
    assets = str(resources.files("swagger_ui") / "static")
    return [
        Route("/docs", docs, methods=["GET"]),
        Mount(ASSETS, app=StaticFiles(directory=assets), name="docs-assets"),
    ]
