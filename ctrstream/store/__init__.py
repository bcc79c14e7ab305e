"""The store: ctrstream's online feature store on Redis, and the only code that knows Redis.

Every Redis key and field is built and parsed in :mod:`~ctrstream.store.layout`; every
connection is opened in :mod:`~ctrstream.store.connection`; RESP bytes are written in
:mod:`~ctrstream.store.resp`. The rest of ctrstream speaks in domain terms - entities,
ids, resolutions, buckets, counts, views, versions - through a few interfaces, in the
spirit of Chronon's ``KVStore`` (multi-get, multi-put) and Feast's ``OnlineStore`` (one
class reads and writes the store):

* **multi-get of window counts**: :class:`~ctrstream.store.reader.FeatureStore` (sync) and
  :class:`~ctrstream.store.reader.AsyncFeatureStore` (asyncio) - ``read(keys, t)``,
  ``read_rows``, ``read_columns`` - one core (:class:`~ctrstream.store.reader.ReaderCore`,
  no I/O) planned by :mod:`~ctrstream.store.plan`, one Lua script (``read.lua``) that gets
  every key it touches in ``KEYS``, a shared-entity cache (:mod:`~ctrstream.store.cache`)
  kept exact by Redis' invalidation reports (:mod:`~ctrstream.store.tracking`);
* **the speed view**: :mod:`~ctrstream.store.speed_view` - its writer
  (:class:`~ctrstream.store.speed_view.SpeedViewWriter`, multi-put of absolute cells) and
  its readers and repairs outside the prediction path, in cells ``(entity, id, resolution,
  event type, bucket)``;
* **the batch view**: :mod:`~ctrstream.store.batch_view` - a computed view written under a
  version, the version lifecycle (register, meta, pointer switch, prune) and its scans;
* reconciliation reports (:mod:`~ctrstream.store.reports`), the decay monitor's state
  (:mod:`~ctrstream.store.monitor`) and the calibrators' checkpoints
  (:mod:`~ctrstream.store.calibration`); :mod:`~ctrstream.store.scan` reads whole views.
  :mod:`~ctrstream.store.usage` measures their memory (``MEMORY USAGE`` by entity family).

Nothing here imports the speed or batch layer: the store sits on the declarations
(:mod:`ctrstream.features`) and the settings only.
"""
