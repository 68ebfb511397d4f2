"""RunPod: the pod manifest schema (`manifest`), RunPod's REST API v2 over plain HTTP (`rest`, the
only module that sends REST requests), the legacy GraphQL call for spot pods (`spot`), what podtrain
asks of RunPod (`api`), the reaper (`reaper`), the runpodctl line (`runpodctl`), files over SSH
(`remote`) and the `orchestrate pod|volume ...` command line (`cli`)."""
