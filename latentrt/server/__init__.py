"""The A1111-compatible HTTP API over a :class:`~latentrt.service.GenerationService` (needs the ``serve`` extra).

.. code-block:: python

    import uvicorn
    from latentrt.server import create_app
    from latentrt.service import GenerationService

    uvicorn.run(create_app(GenerationService("demo")), host="127.0.0.1", port=7860)
"""

from __future__ import annotations

from latentrt.server.a1111 import Defaults
from latentrt.server.app import create_app

__all__ = ["Defaults", "create_app"]
