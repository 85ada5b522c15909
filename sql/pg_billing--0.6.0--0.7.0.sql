-- pg_billing 0.6.0 -> 0.7.0: the speed of a debit (issue 13) and Citus routing (issue 17).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.7.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.7.0'" to load this file. \quit
