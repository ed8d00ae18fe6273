//! Who sends to whom: `pairs` (N senders → N receivers, one each), `fan-in`
//! (N → 1) and `fan-out` (1 → N), over `instances × agents` endpoints (each
//! instance is one connection carrying `agents` agent streams).

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
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Pairs => "pairs",
            Workload::FanIn => "fan-in",
            Workload::FanOut => "fan-out",
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
            Workload::Pairs => (many, many),
            Workload::FanIn => (many, one),
            Workload::FanOut => (one, many),
        };
        let targets = (0..senders.endpoints())
            .map(|k| match workload {
                Workload::Pairs => vec![k],
                Workload::FanIn => vec![0],
                Workload::FanOut => (0..receivers.endpoints()).collect(),
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
