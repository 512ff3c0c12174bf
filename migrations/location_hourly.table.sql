-- One row per (hour, device_id, user_id, app_source). The first columns are
-- the seed's (004) continuous aggregate, so dashboards written for it keep
-- working; the bounding box is for fleet maps. Kept by locus from the raw
-- points of the hours each batch touched.
CREATE TABLE location_hourly (
    hour          timestamptz      NOT NULL,
    device_id     uuid             NOT NULL,
    user_id       uuid             NOT NULL,
    app_source    text             NOT NULL,
    point_count   bigint           NOT NULL,
    avg_latitude  double precision NOT NULL,
    avg_longitude double precision NOT NULL,
    avg_speed     double precision,
    max_speed     real,
    first_event   timestamptz      NOT NULL,
    last_event    timestamptz      NOT NULL,
    min_latitude  double precision NOT NULL,
    max_latitude  double precision NOT NULL,
    min_longitude double precision NOT NULL,
    max_longitude double precision NOT NULL,
    PRIMARY KEY (hour, device_id, user_id, app_source)
)
