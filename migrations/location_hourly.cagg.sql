-- The same columns as location_hourly.table.sql, as a continuous aggregate.
-- Real-time aggregation is on: the hours not yet materialized are computed
-- from the raw points at query time.
CREATE MATERIALIZED VIEW location_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT
    time_bucket(INTERVAL '1 hour', time) AS hour,
    device_id,
    user_id,
    app_source,
    count(*)       AS point_count,
    avg(latitude)  AS avg_latitude,
    avg(longitude) AS avg_longitude,
    avg(speed)     AS avg_speed,
    max(speed)     AS max_speed,
    min(time)      AS first_event,
    max(time)      AS last_event,
    min(latitude)  AS min_latitude,
    max(latitude)  AS max_latitude,
    min(longitude) AS min_longitude,
    max(longitude) AS max_longitude
FROM location_events
GROUP BY 1, 2, 3, 4
WITH NO DATA
