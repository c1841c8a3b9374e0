-- Runs once, when the Postgres volume is first initialised (docker-entrypoint-initdb.d), as POSTGRES_USER.
-- The tracking store uses POSTGRES_DB (mlflow); MLflow's basic-auth users and permissions get a
-- database of their own, so either can be backed up, restored or moved independently.
CREATE DATABASE mlflow_auth;
