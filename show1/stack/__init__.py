"""A team's stack on one machine (PostgreSQL, an S3 store, MLflow and Prefect servers, Prefect workers), started
and stopped by `show1 stack up|down` (`make stack`): see stack.py."""
