-- The relay registry lives in its own database and role beside Temporal's.
CREATE ROLE relay LOGIN PASSWORD 'relay';
CREATE DATABASE relay OWNER relay;
