"""The OpenAI-compatible HTTP proxy (aiohttp): routes each request through the director and
streams the chosen engine's answer back."""
