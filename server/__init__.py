"""The HTTP server (``engine serve``): FastAPI routes over one ``AsyncEngine``.

``server.app.create_app(settings)`` builds the app; ``server.cli`` runs it under
uvicorn. Layers: ``routes`` (parse, format) -> ``service`` (parameters, engine calls,
disconnects, errors) -> ``engine.async_engine``. See ``server.app`` for the lifecycle.
"""
