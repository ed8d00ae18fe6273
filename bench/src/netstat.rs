//! Packets per message: the machine's UDP datagrams and TCP segments sent,
//! from `/proc/net/snmp`, read at the start and the end of a measured
//! window. They are counted for the whole network namespace, so the figure
//! is only meaningful on a quiet machine, with everything of the run on
//! loopback (every packet then has the server at one end: relay or
//! nats-server). A UDP send carrying a GSO batch counts once.

/// Sent-packet counters of the network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    pub udp_datagrams: u64,
    pub tcp_segments: u64,
}

impl Sent {
    /// The counters now; `None` where `/proc/net/snmp` cannot be read.
    pub fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/net/snmp").ok()?)
    }

    fn parse(snmp: &str) -> Option<Self> {
        let field = |proto: &str, name: &str| -> Option<u64> {
            let mut rows = snmp.lines().filter(|l| l.starts_with(proto));
            let (head, values) = (rows.next()?, rows.next()?);
            let at = head.split_whitespace().position(|h| h == name)?;
            values.split_whitespace().nth(at)?.parse().ok()
        };
        Some(Self {
            udp_datagrams: field("Udp:", "OutDatagrams")?,
            tcp_segments: field("Tcp:", "OutSegs")?,
        })
    }

    /// Packets sent since `earlier` (UDP and TCP together: a run uses one).
    pub fn since(&self, earlier: &Sent) -> u64 {
        self.udp_datagrams.saturating_sub(earlier.udp_datagrams)
            + self.tcp_segments.saturating_sub(earlier.tcp_segments)
    }
}

/// Counts packets from `start()` to `stop()`.
#[derive(Debug)]
pub struct PacketMeter(Option<Sent>);

impl PacketMeter {
    pub fn start() -> Self {
        Self(Sent::read())
    }

    /// Packets sent since `start`, if both readings worked.
    pub fn stop(&self) -> Option<u64> {
        Some(Sent::read()?.since(self.0.as_ref()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sent_columns_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
Tcp: RtoAlgorithm RtoMin InSegs OutSegs\nTcp: 1 200 649386 648034\n\
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 1984280 0 0 1984281 7\n\
UdpLite: InDatagrams NoPorts InErrors OutDatagrams\nUdpLite: 0 0 0 0\n";
        let s = Sent::parse(snmp).unwrap();
        assert_eq!(s.udp_datagrams, 1_984_281);
        assert_eq!(s.tcp_segments, 648_034);
        let later = Sent {
            udp_datagrams: 1_984_381,
            tcp_segments: 648_034,
        };
        assert_eq!(later.since(&s), 100);
        assert!(Sent::parse("Udp: InDatagrams\nUdp: 1\n").is_none());
    }
}
