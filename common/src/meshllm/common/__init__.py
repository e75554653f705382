"""Code shared by every mesh-llm service: domain types, wire conversion, config,
membership in etcd, logging. It never imports a service."""
