"""Simulated edge devices that run the real agent against faulty hardware.

``firmware_sim.disk`` (slots/disk: fault-injecting, durability-modelling
filesystem; ENOSPC), ``firmware_sim.device`` (``SimDevice``: boot, power
cycles, crashes, downloads over the network), ``firmware_sim.network`` (a
real MQTT broker, a chunk service built on ``edgefleet.chunks.ChunkResponder``
and each device's connection feeding the real ``agent.download.Downloader``;
faults: seeded frame loss, delays, disconnects, corrupted chunks, broker
restarts, power cuts mid-download), ``firmware_sim.campaign`` (every-mutation
crash sweeps and the recovery invariants), ``firmware_sim.sigkill`` (SIGKILL
campaigns against real ``edgefleet agent install`` processes) and
``firmware_sim.models`` (models and signed bundles made in code).
"""
