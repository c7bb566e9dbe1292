"""The browser view of the live path: a WebSocket/HTTP server (aiohttp) and its static page."""
