//! GetPreferredAllocation: which of the available devices kubelet should
//! pick. A VM's devices should share a NUMA node, and an IOMMU group is
//! the unit vfio hands to one VM: splitting a group between allocations
//! leaves its other devices unusable by anyone else, so whole groups are
//! taken first and a group is split only when nothing else fits.

use std::collections::BTreeMap;

use crate::inventory::Advertised;

#[derive(Debug, Clone)]
struct Candidate {
    id: String,
    numa: Option<i64>,
    group: Option<u32>,
}

/// `size` device ids: every id of `must_include` (kubelet requires them),
/// then the best of `available`. Ids kubelet offers that the inventory
/// does not know are used last, as devices with no topology.
pub fn preferred(
    devices: &[Advertised],
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Vec<String> {
    let lookup = |id: &str| {
        let d = devices.iter().find(|d| d.id == id);
        Candidate {
            id: id.to_owned(),
            numa: d.and_then(|d| d.numa_node),
            group: d.and_then(|d| d.iommu_group),
        }
    };
    let mut chosen: Vec<Candidate> = Vec::new();
    for id in must_include {
        if !chosen.iter().any(|c| &c.id == id) {
            chosen.push(lookup(id));
        }
    }
    if chosen.len() >= size {
        return chosen.into_iter().map(|c| c.id).collect();
    }
    let mut pool: Vec<Candidate> = Vec::new();
    for id in available {
        if !chosen.iter().any(|c| &c.id == id) && !pool.iter().any(|c| &c.id == id) {
            pool.push(lookup(id));
        }
    }
    pool.sort_by(|a, b| a.id.cmp(&b.id));
    let need = size - chosen.len();

    // NUMA nodes that can hold the rest alone: the must-include devices'
    // node first, then the fullest fit (keeps bigger nodes for bigger
    // requests), devices without a node last.
    let mut by_node: BTreeMap<Option<i64>, Vec<Candidate>> = BTreeMap::new();
    for c in &pool {
        by_node.entry(c.numa).or_default().push(c.clone());
    }
    let must_node = match chosen.first().map(|c| c.numa) {
        Some(n) if chosen.iter().all(|c| c.numa == n) => n,
        _ => None,
    };
    let mut nodes: Vec<(Option<i64>, Vec<Candidate>)> = by_node
        .into_iter()
        .filter(|(_, list)| list.len() >= need)
        .collect();
    nodes.sort_by_key(|(node, list)| {
        (
            !(node.is_some() && *node == must_node),
            node.is_none(),
            list.len(),
            *node,
        )
    });
    let picked = match nodes.into_iter().next() {
        Some((_, list)) => pick_groups(&list, need, &chosen),
        None => pick_groups(&pool, need, &chosen),
    };
    chosen.into_iter().chain(picked).map(|c| c.id).collect()
}

/// `need` candidates, taking whole IOMMU groups where they fit: first the
/// rest of a group a must-include device already opened, then the largest
/// groups that fit, and only then part of the smallest group.
fn pick_groups(pool: &[Candidate], need: usize, chosen: &[Candidate]) -> Vec<Candidate> {
    // A device without a group is a group of its own.
    let mut groups: Vec<(bool, Vec<Candidate>)> = Vec::new();
    let mut index: BTreeMap<u32, usize> = BTreeMap::new();
    for c in pool {
        match c.group {
            Some(g) => {
                let i = *index.entry(g).or_insert_with(|| {
                    let opened = chosen.iter().any(|m| m.group == Some(g));
                    groups.push((opened, Vec::new()));
                    groups.len() - 1
                });
                groups[i].1.push(c.clone());
            }
            None => groups.push((false, vec![c.clone()])),
        }
    }
    let mut out = Vec::new();
    let mut remaining = need;
    while remaining > 0 && !groups.is_empty() {
        let fits = |g: &(bool, Vec<Candidate>)| g.1.len() <= remaining;
        let best = (0..groups.len())
            .filter(|&i| fits(&groups[i]))
            .max_by_key(|&i| (groups[i].0, groups[i].1.len(), std::cmp::Reverse(i)))
            .or_else(|| (0..groups.len()).min_by_key(|&i| (!groups[i].0, groups[i].1.len(), i)));
        let Some(i) = best else { break };
        let (_, members) = groups.remove(i);
        let take = members.len().min(remaining);
        remaining -= take;
        out.extend(members.into_iter().take(take));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, numa: Option<i64>, group: Option<u32>) -> Advertised {
        Advertised {
            id: id.into(),
            pci_address: String::new(),
            iommu_group: group,
            numa_node: numa,
            healthy: true,
            reason: None,
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn two_devices_come_from_one_numa_node() {
        let devs = [
            dev("a0", Some(0), Some(1)),
            dev("b1", Some(1), Some(2)),
            dev("c0", Some(0), Some(3)),
            dev("d1", Some(1), Some(4)),
            dev("e1", Some(1), Some(5)),
        ];
        let all = ids(&["a0", "b1", "c0", "d1", "e1"]);
        // Node 0 fits exactly (best fit), leaving node 1's three together.
        assert_eq!(sorted(preferred(&devs, &all, &[], 2)), ids(&["a0", "c0"]));
        // A must-include device on node 1 pulls the rest to node 1.
        let p = preferred(&devs, &all, &ids(&["d1"]), 2);
        assert_eq!(p[0], "d1");
        assert!(p[1].ends_with('1'), "{p:?}");
        // Three only fit on node 1.
        assert_eq!(
            sorted(preferred(&devs, &all, &[], 3)),
            ids(&["b1", "d1", "e1"])
        );
    }

    #[test]
    fn whole_iommu_groups_are_taken_before_a_group_is_split() {
        let devs = [
            dev("g7a", Some(0), Some(7)),
            dev("g7b", Some(0), Some(7)),
            dev("g8", Some(0), Some(8)),
            dev("g9", Some(0), Some(9)),
        ];
        let all = ids(&["g7a", "g7b", "g8", "g9"]);
        assert_eq!(sorted(preferred(&devs, &all, &[], 2)), ids(&["g7a", "g7b"]));
        // One device: a group of one, never half of group 7.
        assert_eq!(preferred(&devs, &all, &[], 1), ids(&["g8"]));
        // A must-include half of group 7 is completed with its partner.
        assert_eq!(
            preferred(&devs, &all, &ids(&["g7b"]), 2),
            ids(&["g7b", "g7a"])
        );
        // Three: group 7 whole, then a group of one.
        let p = sorted(preferred(&devs, &all, &[], 3));
        assert!(
            p.contains(&"g7a".to_string()) && p.contains(&"g7b".to_string()),
            "{p:?}"
        );
    }

    #[test]
    fn spans_nodes_only_when_no_node_is_big_enough_and_never_exceeds_size() {
        let devs = [
            dev("a0", Some(0), Some(1)),
            dev("b1", Some(1), Some(2)),
            dev("x", None, None),
        ];
        let all = ids(&["a0", "b1", "x", "unknown"]);
        let p = preferred(&devs, &all, &[], 3);
        assert_eq!(p.len(), 3);
        let p = preferred(&devs, &all, &ids(&["a0", "b1"]), 1);
        assert_eq!(p, ids(&["a0", "b1"]), "must-include devices are all kept");
        assert_eq!(preferred(&devs, &ids(&["x"]), &[], 2), ids(&["x"]));
    }
}
