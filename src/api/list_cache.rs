//! The JSON of the device list, kept per registry version.
//!
//! A registry version is immutable (`Arc<Registry>`), and so is its JSON:
//! the first request after a change serialises the registry into one body
//! `[dev,dev,...]\n`, noting where each record's JSON lies in it (in the
//! registry's order, by address) and which records carry each tag. Until
//! the next change every request is answered from that:
//! - the full list is the body itself, shared by every response;
//! - a tag-filtered list intersects the filter's tag postings and copies
//!   the matching records' spans into a body of their own; bodies of at
//!   least [`SHARED_FILTERED_MIN`] bytes are kept for the version (up to
//!   the full body's size in all), because a control plane asks for its
//!   pool with the same filter over and over, and 64 clients each holding
//!   their own copy of half the list is what makes memory grow;
//! - one device is its span.
//!
//! A record that did not change since the previous version keeps its
//! bytes, so after a change to one device only that device is serialised
//! again. The bytes are exactly those of serialising each record on its
//! own (`serde_json`, compact), so a filtered list is byte for byte the
//! full list with the other records left out.
//!
//! The full body and the kept filtered bodies are sealed
//! ([`zero_copy`]): sockets get them with `sendfile`, without a copy each.
//!
//! Concurrency: one mutex around the current version, held while a new
//! version is built (so concurrent requests after a change build it once);
//! answering from a built version takes only an `Arc` clone under it.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{wire, zero_copy};
use crate::pci::PciIds;
use crate::registry::Registry;

/// Filtered bodies this large or larger are kept for the version.
pub const SHARED_FILTERED_MIN: usize = 16 * 1024;
/// At most this many filtered bodies are kept for one version.
const SHARED_FILTERED_MAX: usize = 32;

/// Tag key → tag value → positions (ascending) of the records with it.
type TagIndex = HashMap<String, HashMap<String, Vec<u32>>>;

/// One registry version, serialised.
pub struct ListVersion {
    registry: Arc<Registry>,
    body: Bytes,
    /// Each record's JSON in `body`, in the registry's order.
    spans: Vec<Range<usize>>,
    /// Ids and names → positions; an id wins over an equal name, as in
    /// [`Registry::resolve`].
    by_id_or_name: HashMap<String, u32>,
    by_tag: TagIndex,
    filtered: Mutex<SharedFiltered>,
}

#[derive(Default)]
struct SharedFiltered {
    /// Most recently used first; filters normalised (sorted).
    bodies: VecDeque<(Vec<(String, String)>, Bytes)>,
    bytes: usize,
}

/// The device list serialised once per registry version, so a busy `GET
/// /devices` costs no serialisation while nothing changes.
#[derive(Default)]
pub struct ListCache {
    current: Mutex<Option<Arc<ListVersion>>>,
}

impl ListCache {
    /// The serialised form of the registry `snapshot` returns. The snapshot
    /// is taken under the cache's lock, so a request never replaces a newer
    /// version with an older one it read before waiting.
    pub fn version(
        &self,
        snapshot: impl FnOnce() -> Arc<Registry>,
        ids: &PciIds,
    ) -> Arc<ListVersion> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let registry = snapshot();
        if let Some(v) = current.as_ref() {
            if Arc::ptr_eq(&v.registry, &registry) {
                return v.clone();
            }
        }
        let built = Arc::new(ListVersion::build(registry, ids, current.as_deref()));
        *current = Some(built.clone());
        built
    }
}

impl ListVersion {
    fn build(registry: Arc<Registry>, ids: &PciIds, previous: Option<&ListVersion>) -> ListVersion {
        let n = registry.len();
        let mut body = Vec::with_capacity(previous.map_or(n * 700, |p| p.body.len() + 1024) + 3);
        let mut spans = Vec::with_capacity(n);
        let mut by_id_or_name = HashMap::with_capacity(2 * n);
        let mut by_tag = TagIndex::new();
        // Both versions iterate by ascending address: walk them together.
        let mut before = previous.map(|p| (p.registry.iter().zip(&p.spans).peekable(), &p.body));
        body.push(b'[');
        for (position, record) in registry.iter().enumerate() {
            if position > 0 {
                body.push(b',');
            }
            let start = body.len();
            let mut unchanged = None;
            if let Some((old, old_body)) = before.as_mut() {
                while old
                    .next_if(|(d, _)| d.pci_address < record.pci_address)
                    .is_some()
                {}
                if let Some((d, span)) = old.peek() {
                    if *d == record {
                        unchanged = Some(&old_body[(*span).clone()]);
                    }
                }
            }
            match unchanged {
                Some(bytes) => body.extend_from_slice(bytes),
                None => serde_json::to_writer(&mut body, &wire::Device::new(record, ids))
                    .expect("wire types serialise"),
            }
            spans.push(start..body.len());
            by_id_or_name.insert(record.name.clone(), position as u32);
            for (key, value) in &record.tags {
                by_tag
                    .entry(key.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default()
                    .push(position as u32);
            }
        }
        body.extend_from_slice(b"]\n");
        // After every name, so that an id equal to another device's name
        // resolves to the id's device.
        for (position, record) in registry.iter().enumerate() {
            by_id_or_name.insert(record.id.clone(), position as u32);
        }
        ListVersion {
            registry,
            body: zero_copy::seal(body),
            spans,
            by_id_or_name,
            by_tag,
            filtered: Mutex::default(),
        }
    }

    /// `GET /devices`: every device.
    pub fn full(&self) -> Bytes {
        self.body.clone()
    }

    /// `GET /devices?tags[K]=V&...`: the devices carrying every pair.
    pub fn filtered(&self, filter: &[(String, String)]) -> Bytes {
        if filter.is_empty() {
            return self.full();
        }
        let mut key = filter.to_vec();
        key.sort();
        {
            let mut shared = self.filtered.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = shared.bodies.iter().position(|(f, _)| *f == key) {
                let entry = shared.bodies.remove(at).expect("found");
                let body = entry.1.clone();
                shared.bodies.push_front(entry);
                return body;
            }
        }
        let joined = self.join(&self.matching(filter));
        if joined.len() < SHARED_FILTERED_MIN {
            return Bytes::from(joined);
        }
        // Kept and sent many times: sent from a sealed file.
        let body = zero_copy::seal(joined);
        {
            let mut shared = self.filtered.lock().unwrap_or_else(|p| p.into_inner());
            if !shared.bodies.iter().any(|(f, _)| *f == key) {
                shared.bytes += body.len();
                shared.bodies.push_front((key, body.clone()));
                while shared.bodies.len() > SHARED_FILTERED_MAX || shared.bytes > self.body.len() {
                    let Some((_, evicted)) = shared.bodies.pop_back() else {
                        break;
                    };
                    shared.bytes -= evicted.len();
                }
            }
        }
        body
    }

    /// `GET /devices/{id_or_name}`: the device's JSON and a newline, or
    /// `None` if nothing of that id or name is registered.
    pub fn device(&self, id_or_name: &str) -> Option<Bytes> {
        let position = *self.by_id_or_name.get(id_or_name)? as usize;
        let span = &self.body[self.spans[position].clone()];
        let mut one = Vec::with_capacity(span.len() + 1);
        one.extend_from_slice(span);
        one.push(b'\n');
        Some(Bytes::from(one))
    }

    /// Positions of the records that carry every pair of `filter`: the
    /// shortest posting list, kept where every other list has it too.
    fn matching(&self, filter: &[(String, String)]) -> Vec<u32> {
        let mut postings = Vec::with_capacity(filter.len());
        for (key, value) in filter {
            match self.by_tag.get(key).and_then(|values| values.get(value)) {
                Some(list) => postings.push(list.as_slice()),
                None => return Vec::new(),
            }
        }
        postings.sort_by_key(|list| list.len());
        let Some((shortest, others)) = postings.split_first() else {
            return Vec::new();
        };
        shortest
            .iter()
            .copied()
            .filter(|p| others.iter().all(|list| list.binary_search(p).is_ok()))
            .collect()
    }

    fn join(&self, positions: &[u32]) -> Vec<u8> {
        let spans: Vec<&[u8]> = positions
            .iter()
            .map(|&p| &self.body[self.spans[p as usize].clone()])
            .collect();
        let mut out = Vec::with_capacity(spans.iter().map(|s| s.len() + 1).sum::<usize>() + 3);
        out.push(b'[');
        for (i, span) in spans.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(span);
        }
        out.extend_from_slice(b"]\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::registry::DeviceRecord;

    /// A small deterministic generator (xorshift64*), so a failure can be
    /// replayed from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const KEYS: [&str; 4] = ["pool", "zone", "team", "gen"];

    fn ids() -> PciIds {
        PciIds::parse("10de  NVIDIA Corporation\n\t2236  GA102GL [A10]\n")
    }

    fn record(i: usize, tags: BTreeMap<String, String>) -> DeviceRecord {
        let f = crate::pci::PciFunction {
            address: format!("0000:{:02x}:{:02x}.{}", 0x10 + i / 64, (i % 64) / 2, i % 2)
                .parse()
                .unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2236,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x030200,
            driver: Some("nvidia".into()),
            iommu_group: Some(i as u32),
            modalias: None,
            own_vfio_provider: false,
        };
        DeviceRecord::registered(format!("id{i}"), format!("gpu{i}"), &f, tags)
    }

    fn random_tags(rng: &mut Rng) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::new();
        for key in KEYS {
            if rng.below(4) != 0 {
                tags.insert(key.to_owned(), format!("v{}", rng.below(3)));
            }
        }
        tags
    }

    fn registry(rng: &mut Rng, n: usize) -> Arc<Registry> {
        Arc::new(Registry::from_records((0..n).map(|i| record(i, random_tags(rng)))).unwrap())
    }

    /// What the list was before this cache: every record serialised on its
    /// own, filtered by hand.
    fn by_hand(registry: &Registry, ids: &PciIds, filter: &[(String, String)]) -> Vec<u8> {
        let wire: Vec<_> = registry
            .iter()
            .filter(|d| filter.iter().all(|(k, v)| d.tags.get(k) == Some(v)))
            .map(|d| wire::Device::new(d, ids))
            .collect();
        let mut body = serde_json::to_vec(&wire).unwrap();
        body.push(b'\n');
        body
    }

    fn random_filter(rng: &mut Rng) -> Vec<(String, String)> {
        (0..1 + rng.below(3))
            .map(|_| {
                let key = KEYS[rng.below(KEYS.len() as u64) as usize];
                // Now and then a value no device has, or a key none has.
                match rng.below(10) {
                    0 => (key.to_owned(), "nobody".to_owned()),
                    1 => ("absent".to_owned(), "v0".to_owned()),
                    _ => (key.to_owned(), format!("v{}", rng.below(3))),
                }
            })
            .collect()
    }

    /// The tag-filtered list answers exactly what the full list filtered by
    /// hand answers, for random tag sets over 1,000 devices, also after
    /// changes that reuse the previous version's bytes.
    #[test]
    fn filtered_lists_are_the_full_list_filtered_by_hand() {
        let ids = ids();
        let cache = ListCache::default();
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut current = registry(&mut rng, 1000);
        for version in 0..4 {
            let v = cache.version(|| current.clone(), &ids);
            assert_eq!(v.full(), by_hand(&current, &ids, &[]), "version {version}");
            for _ in 0..300 {
                let filter = random_filter(&mut rng);
                let want = by_hand(&current, &ids, &filter);
                // Twice: computed, then possibly from the kept bodies.
                assert_eq!(v.filtered(&filter), want, "{filter:?}");
                assert_eq!(v.filtered(&filter), want, "{filter:?}, again");
            }
            for i in [0, 1, 499, 999, 1000] {
                let name = format!("gpu{i}");
                let Some(d) = current.resolve(&name) else {
                    assert!(v.device(&name).is_none());
                    continue;
                };
                let mut want = serde_json::to_vec(&wire::Device::new(d, &ids)).unwrap();
                want.push(b'\n');
                assert_eq!(v.device(&name).unwrap(), want);
                assert_eq!(v.device(&d.id).unwrap(), want);
            }
            assert!(v.device("no-such-device").is_none());
            // The next version: some devices retagged or changed, one
            // removed, one added.
            let mut next = (*current).clone();
            for _ in 0..20 {
                let i = rng.below(1000) as usize;
                let addr = record(i, BTreeMap::new()).pci_address;
                if let Some(d) = next.get_mut_by_address(&addr) {
                    d.tags = random_tags(&mut rng);
                    d.present = rng.below(2) == 0;
                }
            }
            let gone = record(rng.below(1000) as usize, BTreeMap::new()).pci_address;
            next.remove(&gone);
            let _ = next.insert(record(1000 + version, random_tags(&mut rng)));
            current = Arc::new(next);
        }
    }

    #[test]
    fn kept_filtered_bodies_stay_within_the_full_list_size() {
        let ids = ids();
        let cache = ListCache::default();
        let mut rng = Rng(7);
        let registry = registry(&mut rng, 1000);
        let v = cache.version(|| registry.clone(), &ids);
        for _ in 0..200 {
            v.filtered(&random_filter(&mut rng));
        }
        let shared = v.filtered.lock().unwrap();
        assert!(shared.bodies.len() <= SHARED_FILTERED_MAX);
        assert!(shared.bytes <= v.body.len());
        assert_eq!(
            shared.bytes,
            shared.bodies.iter().map(|(_, b)| b.len()).sum::<usize>()
        );
    }

    /// As the registry resolves: by id first, then by name.
    #[test]
    fn a_device_is_found_by_id_before_name() {
        let ids = ids();
        let mut first = record(0, BTreeMap::new());
        first.name = "shared".into();
        let mut second = record(1, BTreeMap::new());
        second.id = "shared".into();
        let registry = Arc::new(Registry::from_records([first, second]).unwrap());
        let v = ListCache::default().version(|| registry.clone(), &ids);
        let found: serde_json::Value =
            serde_json::from_slice(&v.device("shared").unwrap()).unwrap();
        assert_eq!(found["id"], "shared");
        assert_eq!(found["name"], "gpu1");
        let by_name: serde_json::Value =
            serde_json::from_slice(&v.device("gpu1").unwrap()).unwrap();
        assert_eq!(by_name["id"], "shared");
    }

    #[test]
    fn an_empty_registry_is_an_empty_list() {
        let ids = ids();
        let v = ListCache::default().version(|| Arc::new(Registry::default()), &ids);
        assert_eq!(v.full(), "[]\n");
        assert_eq!(v.filtered(&[("a".into(), "b".into())]), "[]\n");
    }
}
