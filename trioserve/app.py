"""The ASGI entry point: ``hypercorn --worker-class trio 'trioserve.app:create_app()'``."""

from trioserve.api.app import create_app

__all__ = ["create_app"]
