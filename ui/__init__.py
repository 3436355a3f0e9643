"""A web page to try the served EVF-SAM model: `make ui` (python -m ui), see docs/ui.md.

`ui.app` is the page's aiohttp server, `ui.backend` what it asks of Triton (through `clients.aio`),
`ui.overlay` the masks drawn over the image, `ui.browser` a headless Chromium for the tests and the
screenshots (`python -m ui.screenshots`).
"""
