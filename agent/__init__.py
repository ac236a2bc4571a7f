"""The edgefleet device agent (``pip install 'edgefleet[agent]'``).

Core: ``agent.core.Agent`` (updates through the persisted state machine in
``agent.machine``, A/B slots in ``agent.slots``, inference and shadow mode).
Importing this package imports nothing heavy; onnxruntime loads on first use.
The agent never imports torch, fastapi, sqlalchemy, ``server`` or ``compression``.
"""
