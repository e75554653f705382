"""The shard-worker: runs llama.cpp engines for the models the planner places on it."""
