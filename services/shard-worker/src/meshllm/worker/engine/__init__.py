"""The engine process (`python -m meshllm.worker.engine`): everything that runs only in
the child that holds llama.cpp. The worker service talks to it through `engine_wire` alone
(see `worker.engines.ProcessEngine`) and imports nothing from here."""
