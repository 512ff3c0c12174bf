-- Tracking apps that carry an identifier of their own (Traccar Client's
-- device identifier, OwnTracks' user/device) instead of locus's UUIDs.
-- Registering one fixes its device, a UUIDv5 of the app_source and the
-- identifier (see the README), and its user. A device token bound to that
-- device writes for it.
CREATE TABLE locus_trackers (
    app_source  text        NOT NULL CHECK (app_source <> ''),
    tracker_id  text        NOT NULL CHECK (tracker_id <> ''),
    device_id   uuid        NOT NULL UNIQUE,
    user_id     uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_source, tracker_id)
);
