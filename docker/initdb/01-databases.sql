-- Run by the postgres image on its first start (an empty postgres-data volume), as POSTGRES_USER, who owns both.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
