-- Ids a client sees are row numbers through a keyed permutation (tollway.publicids): the key is made
-- here once per installation, shared by every replica through the database.
CREATE TABLE install_secrets (
    name    text PRIMARY KEY,
    secret  bytea NOT NULL
);
INSERT INTO install_secrets (name, secret)
VALUES ('public_ids', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
