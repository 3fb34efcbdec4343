"""The daemon's stages, one module each: intake (watch, claim, recover, reload), decode, infer
(batches through the model) and publish (outputs, archive). Each is a class with ``step()``,
run in a loop by the service; they share a :class:`hotfolder.pipeline.Pipeline` and end jobs
through :class:`hotfolder.outcomes.Outcomes`, and never import one another or the service."""
