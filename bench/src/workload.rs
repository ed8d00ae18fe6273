//! Who sends to whom: `pairs` (N senders → N receivers, one each), `fan-in`
//! (N → 1) and `fan-out` (1 → N), over `instances × agents` endpoints (each
//! instance is one connection carrying `agents` agent streams); and the two
//! named shapes fleets have, both pairs underneath: `fleet` (many quiet
//! instances, one message in flight each) and `large` (64 KiB and 1 MiB
//! messages). Each workload brings its own defaults for `--pairs`,
//! `--window` and `--sizes` ([`Workload::defaults`]); flags given override
//! them.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Sender k → receiver k.
    Pairs,
    /// Every sender → one receiver.
    FanIn,
    /// One sender → every receiver, round robin.
    FanOut,
    /// Pairs of many quiet instances: 500 pairs (1,000 connections), one
    /// message in flight each.
    Fleet,
    /// Pairs with large messages: 4 pairs, 16 in flight, 64 KiB and 1 MiB.
    Large,
    /// `pairs`, `fleet` and `large`, one after another.
    All,
}

/// What a workload runs with unless flags say otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub pairs: usize,
    pub window: usize,
    pub sizes: Vec<usize>,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Pairs => "pairs",
            Workload::FanIn => "fan-in",
            Workload::FanOut => "fan-out",
            Workload::Fleet => "fleet",
            Workload::Large => "large",
            Workload::All => "all",
        }
    }

    /// The workloads `list` names, in order, `all` spelled out, each once.
    pub fn expand(list: &[Workload]) -> Vec<Workload> {
        let mut out = Vec::new();
        for &w in list {
            let each = match w {
                Workload::All => vec![Workload::Pairs, Workload::Fleet, Workload::Large],
                w => vec![w],
            };
            for w in each {
                if !out.contains(&w) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// Whether senders and receivers pair up one to one.
    pub fn is_pairs(self) -> bool {
        matches!(self, Workload::Pairs | Workload::Fleet | Workload::Large)
    }

    /// Pairs, window and payload sizes of this workload.
    pub fn defaults(self) -> Defaults {
        let (pairs, window, sizes) = match self {
            Workload::Fleet => (500, 1, vec![256]),
            Workload::Large => (4, 16, vec![64 * 1024, 1024 * 1024]),
            _ => (4, 64, vec![256]),
        };
        Defaults {
            pairs,
            window,
            sizes,
        }
    }
}

/// One side's endpoints: `instances` connections with `agents` streams each.
#[derive(Debug, Clone, Copy)]
pub struct Side {
    pub instances: usize,
    pub agents: usize,
}

impl Side {
    pub fn endpoints(&self) -> usize {
        self.instances * self.agents
    }

    /// Endpoint index → (instance, agent).
    pub fn locate(&self, k: usize) -> (usize, usize) {
        (k / self.agents, k % self.agents)
    }
}

/// The whole shape of a run.
#[derive(Debug, Clone)]
pub struct Topology {
    pub workload: Workload,
    pub senders: Side,
    pub receivers: Side,
    /// Per sender endpoint: the receiver endpoints it sends to (round robin).
    pub targets: Vec<Vec<usize>>,
}

impl Topology {
    pub fn new(workload: Workload, instances: usize, agents: usize) -> Self {
        let many = Side { instances, agents };
        let one = Side {
            instances: 1,
            agents: 1,
        };
        let (senders, receivers) = match workload {
            Workload::FanIn => (many, one),
            Workload::FanOut => (one, many),
            _ => (many, many),
        };
        let targets = (0..senders.endpoints())
            .map(|k| match workload {
                Workload::FanIn => vec![0],
                Workload::FanOut => (0..receivers.endpoints()).collect(),
                _ => vec![k],
            })
            .collect();
        Self {
            workload,
            senders,
            receivers,
            targets,
        }
    }

    /// `(instance, agent)` of every receiver sender endpoint `k` sends to.
    pub fn target_names(&self, k: usize, names: &Names) -> Vec<(String, String)> {
        self.targets[k]
            .iter()
            .map(|&t| {
                let (ri, ra) = self.receivers.locate(t);
                (names.receiver_instance(ri), Names::receiver_agent(ra))
            })
            .collect()
    }

    /// Label such as `pairs 4×1`.
    pub fn label(&self) -> String {
        let side = match self.workload {
            Workload::FanOut => self.receivers,
            _ => self.senders,
        };
        format!(
            "{} {}×{}",
            self.workload.name(),
            side.instances,
            side.agents
        )
    }
}

/// Names used on the relay (and as NATS subjects): `<prefix>-s<i>` /
/// `<prefix>-r<i>` instances with agents `tx<a>` / `rx<a>`.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn sender_instance(&self, i: usize) -> String {
        format!("{}-s{i}", self.prefix)
    }
    pub fn receiver_instance(&self, i: usize) -> String {
        format!("{}-r{i}", self.prefix)
    }
    pub fn sender_agent(a: usize) -> String {
        format!("tx{a}")
    }
    pub fn receiver_agent(a: usize) -> String {
        format!("rx{a}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_spells_out_the_named_shapes_once_each() {
        assert_eq!(
            Workload::expand(&[Workload::Fleet, Workload::All]),
            vec![Workload::Fleet, Workload::Pairs, Workload::Large]
        );
        assert_eq!(Workload::expand(&[Workload::FanIn]), vec![Workload::FanIn]);
    }

    #[test]
    fn fleet_is_a_thousand_connections_one_in_flight() {
        let d = Workload::Fleet.defaults();
        let t = Topology::new(Workload::Fleet, d.pairs, 1);
        assert_eq!(t.senders.instances + t.receivers.instances, 1000);
        assert_eq!(d.window, 1);
        assert_eq!(t.targets[7], vec![7]);
        assert_eq!(t.label(), "fleet 500×1");
        assert_eq!(Workload::Large.defaults().sizes, vec![65536, 1 << 20]);
    }
}
