# syntax=docker/dockerfile:1
# The MLflow tracking server of the compose stack: the official image (same MLflow version as
# the project's client, constraints.txt) plus the two drivers its configuration needs, which
# that image does not carry: psycopg2 for the PostgreSQL backend store and boto3 for the
# s3:// artifact destination. Built by compose (infra/docker/compose.yaml, service mlflow).
ARG MLFLOW_IMAGE=ghcr.io/mlflow/mlflow:v3.17.2
FROM ${MLFLOW_IMAGE}
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.5
