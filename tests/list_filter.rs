//! `GET /devices?tags[K]=V` over 1,000 registered devices answers exactly
//! what `GET /devices` filtered by hand answers, for random tag sets, and
//! still does after devices change.

use std::collections::BTreeMap;

use common::fakesys::{DeviceSpec, FakeSys};
use common::Daemon;
use serde_json::Value;

const DEVICES: usize = 1000;
const KEYS: [&str; 3] = ["pool", "zone", "team"];

/// xorshift64*: deterministic, so a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn address(i: usize) -> String {
    format!("0000:{:02x}:{:02x}.{}", 0x10 + i / 64, (i % 64) / 2, i % 2)
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

/// 1,000 registered devices, written to the state directory directly
/// (registering them one by one, each saved durably, takes much longer).
fn start(rng: &mut Rng) -> (FakeSys, Daemon) {
    use vfiod::registry::{store::Store, DeviceRecord, Registry};
    let fs = FakeSys::new();
    fs.load_vfio();
    let mut records = Vec::new();
    for i in 0..DEVICES {
        fs.add_device(
            DeviceSpec::new(&address(i), 0x10de, 0x2236, 0x030200)
                .driver("nvidia")
                .group(100 + i as u32),
        );
        let f = vfiod::pci::PciFunction {
            address: address(i).parse().unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2236,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x030200,
            driver: Some("nvidia".into()),
            iommu_group: Some(100 + i as u32),
            modalias: None,
            own_vfio_provider: false,
        };
        records.push(DeviceRecord::registered(
            format!("id{i:04}"),
            format!("gpu{i}"),
            &f,
            random_tags(rng),
        ));
    }
    let mut d = Daemon::start(&fs, &[]);
    d.kill9();
    Store::open(&d.state_dir)
        .unwrap()
        .save(&Registry::from_records(records).unwrap())
        .unwrap();
    d.spawn();
    assert_eq!(d.get("/health").json()["registered_devices"], DEVICES);
    (fs, d)
}

fn random_filter(rng: &mut Rng) -> Vec<(String, String)> {
    (0..1 + rng.below(3))
        .map(|_| {
            let key = KEYS[rng.below(KEYS.len() as u64) as usize];
            match rng.below(10) {
                0 => (key.to_owned(), "nobody".to_owned()),
                1 => ("absent".to_owned(), "v0".to_owned()),
                _ => (key.to_owned(), format!("v{}", rng.below(3))),
            }
        })
        .collect()
}

fn query(filter: &[(String, String)]) -> String {
    filter
        .iter()
        .map(|(k, v)| format!("tags%5B{k}%5D={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn by_hand(all: &[Value], filter: &[(String, String)]) -> Vec<Value> {
    all.iter()
        .filter(|d| filter.iter().all(|(k, v)| d["tags"][k] == v.as_str()))
        .cloned()
        .collect()
}

fn check_random_filters(d: &Daemon, rng: &mut Rng, rounds: usize) {
    let full = d.get("/devices");
    assert_eq!(full.status, 200);
    let all = full.json().as_array().unwrap().clone();
    for _ in 0..rounds {
        let filter = random_filter(rng);
        let r = d.get(&format!("/devices?{}", query(&filter)));
        assert_eq!(r.status, 200, "{filter:?}: {}", r.body);
        assert!(r.header("x-vfiod-event-seq").is_some());
        let got = r.json();
        assert_eq!(
            got.as_array().unwrap(),
            &by_hand(&all, &filter),
            "filter {filter:?}"
        );
    }
}

#[test]
fn tag_filtered_list_is_the_full_list_filtered_by_hand() {
    let mut rng = Rng(0x7a95_1000_0000_0001);
    let (_fs, d) = start(&mut rng);
    check_random_filters(&d, &mut rng, 200);

    // Changes: retag some devices, unregister one, so the next list is
    // built partly from the previous version's bytes.
    for _ in 0..10 {
        let i = rng.below(DEVICES as u64);
        let tags: Vec<String> = random_tags(&mut rng)
            .iter()
            .map(|(k, v)| format!(r#""{k}":"{v}""#))
            .collect();
        let r = d.req(
            "PATCH",
            &format!("/devices/gpu{i}"),
            Some(&format!(r#"{{"tags":{{{}}}}}"#, tags.join(","))),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let gone = rng.below(DEVICES as u64);
    assert_eq!(
        d.req("DELETE", &format!("/devices/gpu{gone}"), None).status,
        204
    );
    check_random_filters(&d, &mut rng, 200);

    // One device by name is the same record as in the list.
    let all = d.get("/devices").json();
    for d_json in all.as_array().unwrap().iter().step_by(97) {
        let name = d_json["name"].as_str().unwrap();
        assert_eq!(&d.get(&format!("/devices/{name}")).json(), d_json);
    }
    d.get(&format!("/devices/gpu{gone}"))
        .expect_error(404, "not_found");
}
