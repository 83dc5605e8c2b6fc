"""Test kit shipped with the package: real servers and real processes, no mocks. Import from the module you need:

- `streamd.testing.daemon`: `running`, a real daemon in the current event loop.
- `streamd.testing.media`: `make_pan_clip`, `encode_jpeg`, `push_frames`.
- `streamd.testing.servers`: `ManagedRedis`, `HttpDir`, `LiveHls`, `RtspServer`, `wait_for`.
- `streamd.testing.cluster`: `ManagedRedisCluster`, a real Redis Cluster of N cluster-enabled redis-servers.
- `streamd.testing.egress`: `Canary` servers on loopback addresses, `RebindingDns`, `connect_guard`.
- `streamd.testing.openai`: `ScriptedOpenAI`, `FaultProxy`, `TransformersServe`, `prompt_text`, `request_images`.
- `streamd.testing.tiny_vlm`: `build_tiny_qwen25vl`, a tiny random-weight Qwen2.5-VL folder built offline.

Nothing is re-exported here, so importing one part never loads the others (numpy, aiohttp, the daemon). Production
code never imports this package.
"""
