"""Wire dialects: each owns its request schema, its mapping into the ``NeutralRequest``
(``neutral.py``) and its ``Renderer`` (``output.assembler``) of the neutral piece stream, streamed
and whole. Everything else, from templating to cancellation, is shared (``api.generation``).

To add a dialect: a module or package here with those three things, and its routes in
``api/routes.py``.
"""
