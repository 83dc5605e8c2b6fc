"""Streams: the manager (what runs here, placement in a fleet, streams added through the API), the per-stream
supervisor (a state machine around a source), the store of API-added streams, and the pipelines they feed."""
