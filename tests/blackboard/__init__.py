"""Blackboard service tests: pure decisions, then real processes with real etcd."""
