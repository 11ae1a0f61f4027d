"""HTTP-server plumbing shared by the rollout engine and the teacher server."""
