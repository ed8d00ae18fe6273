//! Finding an agent by its bare name (`send --to AGENT`, `link.send("xiaobaozi", …)`):
//! the one online instance of the fleet's status where an agent of that
//! name is attached. Pure: the caller brings the status.

use agent_link_proto::InstanceStatus;

/// Why a bare agent name does not name exactly one instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindAgentError {
    /// No online instance has it attached.
    #[error("no online instance has an agent {agent} attached; use INSTANCE/{agent}, or try again when it is online")]
    Nowhere {
        /// The agent name.
        agent: String,
    },
    /// Several have.
    #[error("agent {agent} is attached on several instances ({}); use INSTANCE/{agent}", .instances.join(", "))]
    Several {
        /// The agent name.
        agent: String,
        /// Where it is attached.
        instances: Vec<String>,
    },
}

/// `INSTANCE/agent` for the one online instance in `instances` where
/// `agent` is attached.
pub fn find_agent(instances: &[InstanceStatus], agent: &str) -> Result<String, FindAgentError> {
    let mut found = instances
        .iter()
        .filter(|i| i.online && i.agents.iter().any(|a| a == agent))
        .map(|i| i.instance_id.clone());
    match (found.next(), found.next()) {
        (None, _) => Err(FindAgentError::Nowhere {
            agent: agent.to_string(),
        }),
        (Some(one), None) => Ok(format!("{one}/{agent}")),
        (Some(a), Some(b)) => Err(FindAgentError::Several {
            agent: agent.to_string(),
            instances: [a, b].into_iter().chain(found).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, online: bool, agents: &[&str]) -> InstanceStatus {
        InstanceStatus {
            instance_id: id.into(),
            name: id.into(),
            public_key: [0; 32],
            online,
            agents: agents.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn one_online_attach_names_the_agent_none_or_several_say_so() {
        let fleet = [
            inst("a", true, &["bob"]),
            inst("b", false, &["bob", "eve"]),
            inst("c", true, &["eve"]),
        ];
        assert_eq!(find_agent(&fleet, "bob").unwrap(), "a/bob");
        assert!(matches!(
            find_agent(&fleet, "zed"),
            Err(FindAgentError::Nowhere { .. })
        ));
        let two = [inst("a", true, &["bob"]), inst("c", true, &["bob"])];
        let e = find_agent(&two, "bob").unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent bob is attached on several instances (a, c); use INSTANCE/bob"
        );
    }
}
