"""RunPod: the pod manifest schema (`manifest`), every API call (`api`, the only module that talks
to RunPod), and the `orchestrate pod ...` command line (`cli`)."""
