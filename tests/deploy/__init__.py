"""Offline checks of the deployment files: Dockerfiles, docker-compose.yml and the Helm chart."""
