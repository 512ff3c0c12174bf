-- The raw points, one row per GPS fix. The column names are the seed
-- architecture's (004); the types are chosen for COPY speed and size:
-- double precision coordinates, real for the optional measurements.
-- (app_source, device_id, time) is unique: a point sent twice is stored
-- once; a device id is unique only within its app_source.
-- The setup module adds the tier's partitioning: a hypertable on
-- TimescaleDB, or `PARTITION BY RANGE (time)` on plain PostgreSQL.
CREATE TABLE location_events (
    time        timestamptz      NOT NULL,
    device_id   uuid             NOT NULL,
    user_id     uuid             NOT NULL, -- a user of the auth database; no foreign key can reach it
    app_source  text             NOT NULL,
    latitude    double precision NOT NULL,
    longitude   double precision NOT NULL,
    accuracy    real,                      -- metres
    altitude    real,                      -- metres
    speed       real,                      -- km/h
    heading     real,                      -- degrees, [0, 360)
    metadata    jsonb
)
